//! GradAccumulator: strided gradients and failed adds.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_optim::{Error, GradAccumulator, Reduction};

fn var(shape: (usize, usize)) -> Var {
    Var::from_tensor(&Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap()).unwrap()
}

/// A (3, 2) gradient laid out transposed: not contiguous.
fn strided(k: f32) -> Tensor {
    let t = (Tensor::arange(0f32, 6., &Device::Cpu)
        .unwrap()
        .reshape((2, 3))
        .unwrap()
        * k as f64)
        .unwrap()
        .t()
        .unwrap();
    assert!(!t.is_contiguous());
    t
}

fn sum_of(acc: &GradAccumulator, v: &Var) -> Vec<Vec<f32>> {
    acc.sums().get(v.as_tensor()).unwrap().to_vec2().unwrap()
}

/// The first micro-batch's gradient of `b` is strided; later ones are added to it correctly
/// (the buffer used to keep the strided layout, and the second add failed after `a` was added).
#[test]
fn strided_first_gradient_accumulates() {
    let (a, b) = (var((2, 3)), var((3, 2)));
    let mut acc = GradAccumulator::new([a.clone(), b.clone()], Reduction::Sum);
    for k in 1..=3 {
        let mut g = GradStore::default();
        g.insert(
            a.as_tensor(),
            Tensor::full(k as f32, (2, 3), &Device::Cpu).unwrap(),
        );
        // Strided in every micro-batch but the second.
        let gb = if k == 2 {
            strided(k as f32).contiguous().unwrap()
        } else {
            strided(k as f32)
        };
        g.insert(b.as_tensor(), gb);
        acc.add(&g).unwrap();
    }
    assert_eq!(acc.micro_batches(), 3);
    assert_eq!(sum_of(&acc, &a), vec![vec![6f32; 3]; 2]);
    assert_eq!(sum_of(&acc, &b), strided(6.).to_vec2::<f32>().unwrap());
    // The gradients given are not changed by the in-place adds.
    let g = strided(1.);
    let mut store = GradStore::default();
    store.insert(b.as_tensor(), g.clone());
    acc.add(&store).unwrap();
    assert_eq!(
        g.to_vec2::<f32>().unwrap(),
        strided(1.).to_vec2::<f32>().unwrap()
    );
}

/// An add that fails changes no sum and no count, whichever variable it fails on.
#[test]
fn failed_add_changes_nothing() {
    let (a, b) = (var((2, 3)), var((3, 2)));
    let c = Var::from_tensor(&Tensor::zeros(2, DType::U32, &Device::Cpu).unwrap()).unwrap();
    let mut acc = GradAccumulator::new([a.clone(), b.clone(), c.clone()], Reduction::Sum);
    let mut g = GradStore::default();
    g.insert(
        a.as_tensor(),
        Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    g.insert(b.as_tensor(), strided(1.));
    acc.add(&g).unwrap();
    let before = (sum_of(&acc, &a), sum_of(&acc, &b));

    // A u32 gradient for the last variable: not a dtype the accumulator can add.
    g.insert(
        c.as_tensor(),
        Tensor::ones(2, DType::U32, &Device::Cpu).unwrap(),
    );
    let err = acc.add(&g).unwrap_err();
    assert!(matches!(err, Error::UnsupportedDType { .. }), "{err:?}");
    assert_eq!((sum_of(&acc, &a), sum_of(&acc, &b)), before);
    assert!(acc.sums().get(c.as_tensor()).is_none());

    // A gradient of the wrong shape for the last variable.
    let mut g = GradStore::default();
    g.insert(
        a.as_tensor(),
        Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    g.insert(
        b.as_tensor(),
        Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    let err = acc.add(&g).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err:?}");
    assert_eq!((sum_of(&acc, &a), sum_of(&acc, &b)), before);
    assert_eq!(acc.micro_batches(), 1);
}
